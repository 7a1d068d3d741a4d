"""WISP."""
