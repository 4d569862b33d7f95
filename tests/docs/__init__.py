"""Tests of the documentation: the README's code and the examples run as written."""
