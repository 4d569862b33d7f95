"""maml_mlp's implementation: ``config`` (the call configuration and lr packing), ``fused``
(the one-call kernel launcher), ``layerwise`` (the loop of per-step ops), ``function`` (the
autograd.Function and the public :func:`fastmaml.ops.maml_mlp`)."""
