"""Meta-training end to end: ``python -m fastmaml.train`` (see ``__main__``), the MAML
paper's configurations (:mod:`fastmaml.train.configs`), its networks
(:mod:`fastmaml.train.models`), the algorithm registry (:mod:`fastmaml.train.algos`),
the loop (:mod:`fastmaml.train.loop`) and evaluation (:mod:`fastmaml.train.evaluate`)."""

from fastmaml.train.configs import CONFIGS, Config, get_config

__all__ = ["CONFIGS", "Config", "get_config"]
