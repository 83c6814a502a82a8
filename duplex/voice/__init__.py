"""The one voice pipeline (VAD -> ASR -> session -> clause TTS + playback ledger) and its
transport adapters."""
