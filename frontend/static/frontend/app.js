// Shared page behaviour: a failed htmx request shows its reason (the API's error message) in the
// flash region instead of failing silently; fields with an inline error are marked invalid.
// No build step, no dependencies.
(function () {
  function flash(message) {
    const region = document.getElementById("flash");
    if (!region) return;
    region.textContent = message;
    region.hidden = false;
  }
  document.addEventListener("htmx:responseError", (event) => {
    const xhr = event.detail.xhr;
    let message = "The request failed (HTTP " + xhr.status + ").";
    try {
      const body = JSON.parse(xhr.responseText);
      if (body.error && body.error.message) message = body.error.message;
    } catch (ignored) { /* not JSON: keep the status */ }
    flash(message);
  });
  document.addEventListener("htmx:sendError", () => flash("The server could not be reached."));
  // Selects that act at once (the organization switcher): no inline handlers under the CSP.
  document.addEventListener("change", (event) => {
    if (event.target.matches && event.target.matches("select[data-submit-on-change]")) {
      event.target.form.submit();
    }
  });
  document.addEventListener("htmx:beforeRequest", () => {
    const region = document.getElementById("flash");
    if (region) region.hidden = true;
  });
  // A field whose error message (swapped in by an inline check) is not empty is marked invalid
  // for assistive technology.
  document.addEventListener("htmx:afterSettle", () => {
    for (const message of document.querySelectorAll(".field-error[id]")) {
      const field = document.querySelector('[aria-describedby~="' + message.id + '"]');
      if (!field) continue;
      if (message.textContent.trim()) field.setAttribute("aria-invalid", "true");
      else field.removeAttribute("aria-invalid");
    }
  });
  window.tuneplexFlash = flash;
})();
