"""Pages a person uses in a browser: the playground that ``lorablend serve`` shows at ``/`` (``page``), the sweep
viewer of ``lorablend view`` (``viewer``), and the static files both ship (``assets``: HTML, JS, CSS in
``ui/static``, no build step, no CDN — they work offline)."""
