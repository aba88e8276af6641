// object-heap: how many bytes of a Go process's heap one stored object holds once decoded into maps, the form in
// which the apiserver's watch cache keeps every custom resource (unstructured.Unstructured). Each argument is a
// file holding one object as JSON (`kubectl get -o json --show-managed-fields`); the object is decoded 20,000 times
// and the live heap measured around it, so the figure is exact for this decoder and this Go version, and close to
// what the apiserver holds per object (its watch cache adds a small record per object, and recent events).
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"runtime"
)

const copies = 20000

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: object-heap OBJECT.json...")
		os.Exit(2)
	}
	for _, file := range os.Args[1:] {
		raw, err := os.ReadFile(file)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		held, err := heldBytes(raw)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", file, err)
			os.Exit(1)
		}
		fmt.Printf("%s: %d bytes as stored (JSON), %.0f bytes held decoded\n", file, len(raw), held)
	}
}

// heldBytes decodes raw `copies` times, keeps every copy alive, and returns the live heap per copy.
func heldBytes(raw []byte) (float64, error) {
	held := make([]map[string]interface{}, copies)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range held {
		if err := json.Unmarshal(raw, &held[i]); err != nil {
			return 0, err
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(held)
	return float64(after.HeapAlloc-before.HeapAlloc) / copies, nil
}
