"""Test package: lets tests import shared helpers and the fetched PEFT suite (tests/peft_suite/, git-ignored) with relative imports."""
