"""One conversation's logic: the session loop (sole writer of its sequence), its events, clock,
config and incremental detokenizer."""
