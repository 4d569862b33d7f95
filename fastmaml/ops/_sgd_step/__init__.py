"""sgd_step's implementation: ``checks`` (argument validation), ``launch`` (the kernel
launchers), ``function`` (the autograd.Function and the public :func:`fastmaml.ops.sgd_step`)."""
