"""Test helpers shared by the suite: real vLLM servers, a fault-injecting upstream."""
