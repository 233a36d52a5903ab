// The playground: sends the conversation to /v1/chat/completions with the session (and CSRF
// token) and streams each model's answer into its pane; a thumbs up/down under an answer saves
// the exchange up to it as feedback (POST /v1/feedback). With two panes, "Left is better" /
// "Right is better" under the answers records a comparison (POST /v1/feedback/comparisons): a
// preference pair whose prompt is the better side's conversation. No build step, no dependencies.
(function () {
  const form = document.getElementById("playground");
  if (!form) return;
  const histories = { left: [], right: [] };

  function bubble(side, role, text) {
    const node = document.createElement("p");
    node.className = "msg " + role;
    node.textContent = text;
    document.getElementById("transcript-" + side).appendChild(node);
    return node;
  }

  async function ask(side, model, maxTokens) {
    const history = histories[side];
    const answer = bubble(side, "assistant", "");
    const response = await fetch(form.dataset.endpoint, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": form.dataset.csrf },
      body: JSON.stringify({ model: model, messages: history, stream: true, max_tokens: maxTokens }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      answer.className = "msg error";
      answer.textContent = (body.error && body.error.message) || ("HTTP " + response.status);
      history.pop();
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", text = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const chunk = JSON.parse(event.slice(6));
        for (const choice of chunk.choices || []) {
          text += (choice.delta && choice.delta.content) || "";
        }
        answer.textContent = text;
      }
    }
    history.push({ role: "assistant", content: text });
    if (text.trim()) rateButtons(answer, model, history.slice());
  }

  function rateButtons(answer, model, exchange) {
    const bar = document.createElement("div");
    bar.className = "rate";
    for (const [rating, label, text] of [[1, "Good answer", "👍 Good"], [-1, "Bad answer", "👎 Bad"]]) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "link rate-button";
      button.textContent = text;
      button.setAttribute("aria-label", label + " (save as feedback)");
      button.addEventListener("click", () => sendFeedback(bar, model, exchange, rating));
      bar.appendChild(button);
    }
    answer.after(bar);
  }

  // POST a JSON body from a bar of buttons: on success the bar becomes the note, else the
  // error is shown and the buttons can be pressed again.
  async function save(bar, url, body, saved) {
    for (const button of bar.querySelectorAll("button")) button.disabled = true;
    const response = await fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": form.dataset.csrf },
      body: JSON.stringify(body),
    });
    const note = document.createElement("span");
    note.setAttribute("role", "status");
    if (response.ok) {
      note.textContent = saved;
      bar.replaceChildren(note);
    } else {
      const error = await response.json().catch(() => ({}));
      note.className = "error";
      note.textContent = (error.error && error.error.message) || ("HTTP " + response.status);
      bar.appendChild(note);
      for (const button of bar.querySelectorAll("button")) button.disabled = false;
    }
  }

  function sendFeedback(bar, model, exchange, rating) {
    return save(bar, form.dataset.feedback, { model: model, messages: exchange, rating: rating },
                rating > 0 ? "Saved as a good example." : "Saved as a bad example.");
  }

  function compareButtons(models) {
    const answers = {};
    for (const side of ["left", "right"]) {
      const last = histories[side][histories[side].length - 1];
      if (!last || last.role !== "assistant" || !last.content.trim()) return;
      answers[side] = { model: models[side], content: last.content,
                        prompt: histories[side].slice(0, -1) };
    }
    const bar = document.createElement("div");
    bar.className = "rate compare";
    const label = document.createElement("span");
    label.textContent = "Which answer is better?";
    bar.appendChild(label);
    for (const [better, worse, text] of [["left", "right", "◀ Left is better"],
                                         ["right", "left", "Right is better ▶"]]) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "link compare-button";
      button.dataset.better = better;
      button.textContent = text;
      button.setAttribute("aria-label", text.replace(/[◀▶]/g, "").trim() + " (save the comparison)");
      button.addEventListener("click", () => sendComparison(bar, answers[better], answers[worse]));
      bar.appendChild(button);
    }
    document.getElementById("compare").replaceChildren(bar);
  }

  function sendComparison(bar, better, worse) {
    return save(bar, form.dataset.comparisons,
                { messages: better.prompt,
                  preferred: { model: better.model, content: better.content },
                  non_preferred: { model: worse.model, content: worse.content } },
                "Saved: " + better.model + "'s answer is preferred.");
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const prompt = form.prompt.value.trim();
    if (!prompt) return;
    const maxTokens = parseInt(form.max_tokens.value, 10) || 64;
    const jobs = [];
    const models = {};
    document.getElementById("compare").replaceChildren();
    for (const side of ["left", "right"]) {
      const model = form[side].value;
      if (!model) continue;
      models[side] = model;
      histories[side].push({ role: "user", content: prompt });
      bubble(side, "user", prompt);
      jobs.push(ask(side, model, maxTokens));
    }
    form.prompt.value = "";
    await Promise.all(jobs);
    if (jobs.length === 2 && form.dataset.comparisons) compareButtons(models);
  });

  document.getElementById("reset").addEventListener("click", () => {
    histories.left = []; histories.right = [];
    for (const side of ["left", "right"]) document.getElementById("transcript-" + side).replaceChildren();
    document.getElementById("compare").replaceChildren();
  });
})();
