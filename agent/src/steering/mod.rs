//! steering (in progress)
