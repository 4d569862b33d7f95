"""Tests of the C++ side of the extension (csrc/) through fastmaml._ext."""
