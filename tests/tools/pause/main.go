// pause: the sandbox container of the real nodes' Pods (tests/tools/pause-image.sh),
// doing what Kubernetes' own pause does: hold the Pod's namespaces, reap the zombies
// handed to it as PID 1, and exit on SIGINT or SIGTERM. Built here because the test
// machines cannot pull registry.k8s.io/pause.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
