"""The test suite; its folders mirror the fastmaml package (see docs/ARCHITECTURE.md)."""
