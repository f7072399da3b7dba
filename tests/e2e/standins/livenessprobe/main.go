// livenessprobe stand-in for the e2e tier: the module proxy this project can reach refuses
// github.com/kubernetes-csi/livenessprobe, so this serves what the manifests' probes call, with the
// same flags: GET /healthz on --health-port answers 200 when the driver's Probe says ready within
// --probe-timeout, 500 otherwise.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net/http"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func main() {
	csiAddress := flag.String("csi-address", "/run/csi/socket", "the driver's socket in this container")
	port := flag.Int("health-port", 9808, "port of /healthz")
	timeout := flag.Duration("probe-timeout", time.Second, "how long Probe may take")
	flag.Int("v", 0, "accepted for compatibility")
	flag.Parse()

	conn, err := grpc.NewClient("unix://"+*csiAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	client := csi.NewIdentityClient(conn)
	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), *timeout)
		defer cancel()
		reply, err := client.Probe(ctx, &csi.ProbeRequest{})
		if err != nil {
			http.Error(w, fmt.Sprintf("Probe: %v", err), http.StatusInternalServerError)
			return
		}
		if ready := reply.GetReady(); ready != nil && !ready.GetValue() {
			http.Error(w, "Probe: not ready", http.StatusInternalServerError)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	log.Fatal(http.ListenAndServe(fmt.Sprintf(":%d", *port), nil))
}
