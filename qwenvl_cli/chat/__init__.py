"""`qvl chat`: the REPL state machine and the command's work."""
