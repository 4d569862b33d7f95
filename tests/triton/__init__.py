"""Tests of fastmaml.triton: the Triton kernels really run."""
