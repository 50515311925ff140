"""Where a LimitSet's state lives. Memory is the default; later backends share state further."""
