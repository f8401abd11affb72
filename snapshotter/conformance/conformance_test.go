// containerd's snapshotter conformance suite (snapshots/testsuite, from Debian's
// golang-github-containerd-containerd-dev) run against cora-snapshotter through containerd's
// own proxy snapshotter client, as containerd itself talks to a proxy plugin. Each subtest gets
// a cora-snapshotter process of its own, rooted in the directory the suite hands out.
//
// Built in GOPATH mode with Debian's Go: snapshotter/tests/conformance.rs runs it (as root:
// the suite mounts what the snapshotter returns). CORA_SNAPSHOTTER names the binary.
package conformance

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func TestCoraSnapshotter(t *testing.T) {
	bin := os.Getenv("CORA_SNAPSHOTTER")
	if bin == "" {
		t.Fatal("CORA_SNAPSHOTTER is not set")
	}
	testsuite.SnapshotterSuite(t, "cora", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return start(ctx, bin, root)
	})
}

// start runs cora-snapshotter with its state under root and connects containerd's proxy client.
func start(ctx context.Context, bin, root string) (snapshots.Snapshotter, func() error, error) {
	sock := filepath.Join(root, "cora.sock")
	cfg := filepath.Join(root, "config.json")
	// No lazy backend is needed: the suite never sends CORA labels.
	conf := fmt.Sprintf(`{"root": %q, "address": %q, "transport": "ublk"}`, filepath.Join(root, "state"), sock)
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		return nil, nil, err
	}
	logf, err := os.Create(filepath.Join(root, "..", "snapshotter.log"))
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(bin, "--config", cfg)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() error {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		err := <-exited
		logf.Close()
		return err
	}
	// A blocking dial returns once the daemon accepts on its socket (the dialer retries a
	// socket that does not exist yet), or fails at the deadline.
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(dctx, dialer.DialAddress(sock),
		grpc.WithInsecure(), grpc.WithContextDialer(dialer.ContextDialer), grpc.WithBlock())
	if err != nil {
		_ = stop()
		return nil, nil, fmt.Errorf("connecting to cora-snapshotter at %s: %w", sock, err)
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "cora")
	cleanup := func() error {
		_ = sn.Close()
		_ = conn.Close()
		if err := stop(); err != nil {
			return fmt.Errorf("cora-snapshotter exited: %w", err)
		}
		return nil
	}
	return sn, cleanup, nil
}
