"""Experiments run from the checkout (never installed): benchmarks, demos and Hydra apps.

This package must import with the standard library alone, because `experiments.bootstrap`
runs before any third-party package is installed.
"""
