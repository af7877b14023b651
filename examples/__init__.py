"""Runnable examples of relaymw; see each module's docstring for how to start it."""
