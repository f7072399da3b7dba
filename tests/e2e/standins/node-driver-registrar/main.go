// node-driver-registrar stand-in for the e2e tier: the module proxy this project can reach refuses
// github.com/kubernetes-csi/node-driver-registrar, so this does the part of its job the kubelet
// needs, with the same flags as the manifests pass: ask the driver its name (GetPluginInfo), serve
// the kubelet's plugin-registration API on <registration dir>/<name>-reg.sock, naming the driver's
// socket as the kubelet sees it (--kubelet-registration-path), and answer /healthz.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type registrar struct {
	registerapi.UnimplementedRegistrationServer
	name     string
	endpoint string
}

func (r *registrar) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.name,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registrar) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !s.PluginRegistered {
		// As the real registrar does: exit so the container restarts and registers afresh.
		log.Fatalf("the kubelet refused the registration: %s", s.Error)
	}
	log.Printf("registered with the kubelet as %s", r.name)
	return &registerapi.RegistrationStatusResponse{}, nil
}

// driverName asks the driver its name, retrying while its socket is not there yet (the driver
// container starts beside this one, in no particular order).
func driverName(address string) (string, error) {
	conn, err := grpc.NewClient("unix://"+address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	client := csi.NewIdentityClient(conn)
	for attempt := 0; ; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		info, err := client.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
		cancel()
		if err == nil {
			return info.GetName(), nil
		}
		if attempt == 60 {
			return "", fmt.Errorf("GetPluginInfo on %s: %w", address, err)
		}
		log.Printf("GetPluginInfo on %s: %v (retrying)", address, err)
		time.Sleep(time.Second)
	}
}

func main() {
	csiAddress := flag.String("csi-address", "/run/csi/socket", "the driver's socket in this container")
	kubeletPath := flag.String("kubelet-registration-path", "", "the driver's socket on the host")
	registrationDir := flag.String("plugin-registration-path", "/registration", "the kubelet's plugins_registry in this container")
	httpEndpoint := flag.String("http-endpoint", "", "address of /healthz")
	flag.Int("v", 0, "accepted for compatibility")
	flag.Parse()
	if *kubeletPath == "" {
		log.Fatal("--kubelet-registration-path is required")
	}

	name, err := driverName(*csiAddress)
	if err != nil {
		log.Fatal(err)
	}
	socket := filepath.Join(*registrationDir, name+"-reg.sock")
	if err := os.Remove(socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.Fatalf("removing the stale %s: %v", socket, err)
	}
	listener, err := net.Listen("unix", socket)
	if err != nil {
		log.Fatal(err)
	}
	server := grpc.NewServer()
	registerapi.RegisterRegistrationServer(server, &registrar{name: name, endpoint: *kubeletPath})

	if *httpEndpoint != "" {
		mux := http.NewServeMux()
		// Healthy while the registration socket is in place for the kubelet to find.
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
			if _, err := os.Stat(socket); err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			fmt.Fprintln(w, "ok")
		})
		go func() { log.Fatal(http.ListenAndServe(*httpEndpoint, mux)) }()
	}
	log.Printf("serving the registration of %s (driver socket %s on the host) on %s", name, *kubeletPath, socket)
	log.Fatal(server.Serve(listener))
}
