"""`ray-calib ladder`: short hardware rungs run on the user's cluster before the real job (see `ladder.run`)."""
