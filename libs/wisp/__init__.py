"""WISP: distributed speculative LLM serving (edge drafters, GPU verifiers, Redis streams)."""

__version__ = "0.1.0"
