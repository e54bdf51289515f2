"""Process exit codes shared by every role, so a supervisor (or the demo) can tell failures apart."""

OK = 0
FAILED = 1  # an unexpected error; see the log
USAGE = 2  # click's own code for bad options
REDIS_UNAVAILABLE = 3
CONFIG = 4  # settings are valid alone but do not fit the run (unknown silo, wrong model, ...)
PEER = 5  # the other side reported an error or stopped answering
INTERRUPTED = 130
