"""Tests of fastmaml.bench."""
