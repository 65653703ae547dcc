//! SSE differential cases (filled in once SSE lands).
