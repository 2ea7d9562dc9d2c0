"""Stage 3 evaluation utilities that work on encoders directly (no Lightning)."""
