// Charts drawn from JSON the server puts in the page (json_script): the token-length histogram
// of a dataset and the loss curves of a job. Redrawn after each htmx swap, so a polled section
// that brings new data updates its chart in place. Chart.js is vendored (static/vendor).
(function () {
  function data(id) {
    const node = document.getElementById(id);
    return node ? JSON.parse(node.textContent) : null;
  }

  function histogram() {
    const canvas = document.getElementById("length-histogram");
    const bins = data("histogram-data");
    if (!canvas || !bins || Chart.getChart(canvas)) return;
    new Chart(canvas, {
      type: "bar",
      data: {
        labels: bins.map((b) => b.min + "–" + b.max),
        datasets: [{ label: "examples", data: bins.map((b) => b.count), backgroundColor: "#3856d8" }],
      },
      options: { animation: false, responsive: true, maintainAspectRatio: false,
                 plugins: { legend: { display: false } },
                 scales: { x: { title: { display: true, text: "tokens" } },
                           y: { title: { display: true, text: "examples" }, beginAtZero: true } } },
    });
  }

  // A line chart of metric series by step, updated in place when a poll brings new points.
  function stepChart(canvas, metrics, series, scales) {
    const points = (key) => metrics.step.map((step, i) => ({ x: step, y: metrics[key][i] }))
      .filter((p) => p.y !== null && p.y !== undefined);
    const datasets = series.map((s) => Object.assign({ pointRadius: 2 }, s, { data: points(s.key) }));
    const chart = Chart.getChart(canvas);
    if (chart) {
      chart.data.datasets.forEach((d, i) => { d.data = datasets[i].data; });
      chart.update("none");
      return;
    }
    new Chart(canvas, {
      type: "line",
      data: { datasets: datasets },
      options: { animation: false, responsive: true, maintainAspectRatio: false, parsing: false,
                 scales: Object.assign({ x: { type: "linear", title: { display: true, text: "step" } } },
                                       scales) },
    });
  }

  function losses() {
    const canvas = document.getElementById("loss-chart");
    const metrics = data("job-metrics");
    if (!canvas || !metrics) return;
    stepChart(canvas, metrics, [
      { key: "train_loss", label: "training loss", borderColor: "#3856d8" },
      { key: "eval_loss", label: "evaluation loss", borderColor: "#d8643a", pointRadius: 3 },
    ], { y: { title: { display: true, text: "loss" } } });
  }

  // DPO jobs: the reward margin (chosen minus rejected reward) and the share of pairs whose
  // chosen answer the adapter rewards more, per step, on two axes.
  function rewards() {
    const canvas = document.getElementById("reward-chart");
    const metrics = data("job-metrics");
    if (!canvas || !metrics || !metrics.reward_margin) return;
    stepChart(canvas, metrics, [
      { key: "reward_margin", label: "reward margin", borderColor: "#3856d8", yAxisID: "margin" },
      { key: "reward_accuracy", label: "reward accuracy", borderColor: "#2e9d5b",
        yAxisID: "accuracy" },
    ], { margin: { position: "left", title: { display: true, text: "margin" } },
         accuracy: { position: "right", min: 0, max: 1, title: { display: true, text: "accuracy" } } });
  }

  function draw() {
    if (typeof Chart === "undefined") return;
    histogram();
    losses();
    rewards();
  }
  document.addEventListener("DOMContentLoaded", draw);
  document.addEventListener("htmx:afterSettle", draw);
})();
