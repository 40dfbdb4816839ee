"""Images and videos checked at the edge, the video reader, and their sizing. No torch."""
