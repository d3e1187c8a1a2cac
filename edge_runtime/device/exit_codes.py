"""`gkt-edge` exit codes; systemd's unit decides from them whether a restart can help."""

EXIT_OK = 0  # the hub ended the federation, or a clean SIGTERM/SIGINT stop
EXIT_USAGE = 2  # bad arguments or config: a restart cannot fix a typo
EXIT_NEW_RUN = 3  # with --new-run, the hub started another run: a restart joins it
EXIT_BROKER = 4  # broker unreachable: worth retrying
EXIT_AUTH = 5  # the broker refused our credentials (revoked, wrong): re-enrol, then start
EXIT_REFUSED = 6  # the hub refused the device for good (another run's classes or input
#                   size, more samples than it takes, an incompatible protocol): fix, then start
EXIT_DISK_FULL = 7  # the state dir's disk is full: free space, then start (it resumes)
NO_RESTART = (EXIT_USAGE, EXIT_AUTH, EXIT_REFUSED, EXIT_DISK_FULL)
