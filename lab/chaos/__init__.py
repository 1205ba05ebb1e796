"""The fault scenarios of ``recsys chaos``: each breaks one part of the running system and checks what it promised."""
