"""Getting alerts and kill-switch changes out to people and systems, durably."""
