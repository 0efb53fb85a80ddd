"""Text and prompts: calibration and held-out text, token chunks, chat-template rendering, passkey prompts."""
