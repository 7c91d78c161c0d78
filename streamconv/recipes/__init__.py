"""Model-family knowledge: key mapping, tensor arrangements and config mapping, one file per family."""
