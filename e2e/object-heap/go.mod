module bgjobs.dev/object-heap

go 1.19
