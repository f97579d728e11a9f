"""Conversations shared by the tests."""

CONVERSATIONS = [
    # (prompt, completion): single turn, multi-turn, system prompt, empty completion, unicode and newlines
    ("Hello!", "Hi, how can I help you?"),
    ("What is 2+2?", ""),
    ([{"role": "user", "content": "Name a colour."},
      {"role": "assistant", "content": "Blue."},
      {"role": "user", "content": "Another one, please."}], "Green, like grass."),
    ([{"role": "system", "content": "You are terse."},
      {"role": "user", "content": "Why is the sky blue?"}], "Rayleigh scattering.\n\nShort waves scatter more."),
    ("Écris une phrase en français, s'il te plaît.", "  Voilà : « le café est chaud » ✓"),
    ("Count: 1 2 3", [{"role": "assistant", "content": "4 5 6"}]),
]
