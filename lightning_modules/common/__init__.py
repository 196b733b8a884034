"""What every part of the protocol shares: the module base, the trainer, schedules, metrics and
figures."""
