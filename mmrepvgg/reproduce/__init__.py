"""Reproduction of the bundled experiments (tools/reproduce.py): the suites and the
published numbers (``experiments``), the checks before training (``preflight``), one
experiment's steps (``plan``), the resumable run (``run``) and the tables (``results``)."""
from .experiments import SUITES, suite_configs
from .run import ReproduceOptions, reproduce

__all__ = ['ReproduceOptions', 'SUITES', 'reproduce', 'suite_configs']
