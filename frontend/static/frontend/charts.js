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

  function losses() {
    const canvas = document.getElementById("loss-chart");
    const metrics = data("job-metrics");
    if (!canvas || !metrics) return;
    const points = (key) => metrics.step.map((step, i) => ({ x: step, y: metrics[key][i] }))
      .filter((p) => p.y !== null && p.y !== undefined);
    const datasets = [
      { label: "training loss", data: points("train_loss"), borderColor: "#3856d8", pointRadius: 2 },
      { label: "evaluation loss", data: points("eval_loss"), borderColor: "#d8643a", pointRadius: 3 },
    ];
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
                 scales: { x: { type: "linear", title: { display: true, text: "step" } },
                           y: { title: { display: true, text: "loss" } } } },
    });
  }

  function draw() {
    if (typeof Chart === "undefined") return;
    histogram();
    losses();
  }
  document.addEventListener("DOMContentLoaded", draw);
  document.addEventListener("htmx:afterSettle", draw);
})();
