"""Tests of fastmaml.ops: one test module per op, its cases module, and the op-vs-twin registry."""
