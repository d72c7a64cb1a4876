// Command etcd is the etcd server of the pinned version, built from its Go module
// so the control-plane harness does not depend on Debian's older etcd-server.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
