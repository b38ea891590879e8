//! Network namespace and cgroup topology (in progress).
