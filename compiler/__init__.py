"""Compiles @intervene experiment functions into checkpointed code and a plan."""
