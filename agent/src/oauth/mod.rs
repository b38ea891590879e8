//! oauth (in progress)
