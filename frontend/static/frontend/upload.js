// Dataset upload: posts the file to /v1/files (the same API the SDK uses) with the session and
// CSRF token, shows the upload's progress, then opens the dataset's page with its report.
(function () {
  const form = document.getElementById("upload");
  if (!form) return;
  const input = document.getElementById("upload-file");
  const bar = document.getElementById("upload-progress");
  const status = document.getElementById("upload-status");
  const error = document.getElementById("upload-error");
  const button = document.getElementById("upload-button");

  function fail(message) {
    error.textContent = message;
    error.hidden = false;
    bar.hidden = true;
    status.textContent = "";
    button.disabled = false;
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const file = input.files[0];
    if (!file) return fail("Choose a file first.");
    if (file.size > Number(form.dataset.maxBytes)) {
      return fail("The file is " + file.size + " bytes; the limit is " + form.dataset.maxBytes + " bytes.");
    }
    error.hidden = true;
    button.disabled = true;
    bar.hidden = false;
    bar.value = 0;
    const body = new FormData();
    body.append("purpose", "fine-tune");
    body.append("file", file);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", form.dataset.endpoint);
    xhr.setRequestHeader("X-CSRFToken", form.dataset.csrf);
    xhr.upload.addEventListener("progress", (e) => {
      if (!e.lengthComputable) return;
      bar.value = Math.round((100 * e.loaded) / e.total);
      status.textContent = bar.value < 100 ? "Uploading… " + bar.value + "%" : "Validating…";
    });
    xhr.addEventListener("load", () => {
      let reply = {};
      try { reply = JSON.parse(xhr.responseText); } catch (ignored) { /* not JSON */ }
      if (xhr.status === 200 && reply.id) {
        status.textContent = "Done.";
        window.location.assign("/datasets/" + encodeURIComponent(reply.id) + "/");
      } else {
        fail((reply.error && reply.error.message) || "The upload failed (HTTP " + xhr.status + ").");
      }
    });
    xhr.addEventListener("error", () => fail("The upload was interrupted; nothing was stored. Try again."));
    xhr.send(body);
  });
})();
