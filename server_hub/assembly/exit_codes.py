"""`gkt-hub`'s exit codes, all of them (serve, simulate, status, device, hub workers).

A service manager restarts on 3 and 4 (worth a retry) but not on 2 (the command is wrong)
or 5 (a restart cannot help until someone frees disk space).
"""

EXIT_OK = 0
EXIT_NOT_FOUND = 1  # `device revoke` of a device that is not enrolled
EXIT_BAD_ARGS = 2  # bad arguments, a missing dataset, a port that cannot be served
EXIT_NO_DEVICES = 3  # too few devices joined, or none uploaded, before a deadline
EXIT_BROKER = 4  # broker unreachable or could not start; `status`: hub unreachable
EXIT_DISK_FULL = 5  # the state dir's disk filled up: free space, then restart (it resumes)
EXIT_INTERRUPTED = 130  # Ctrl-C: `simulate` at once, `serve` at the second (128 + SIGINT)
