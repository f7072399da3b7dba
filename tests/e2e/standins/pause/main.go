// pause: the sandbox process of every pod in the e2e cluster (no registry is reachable for the
// upstream pause image). It holds the pod's namespaces open, reaps the zombies handed to it as
// PID 1, and exits on SIGINT or SIGTERM, as the upstream pause.c does.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
