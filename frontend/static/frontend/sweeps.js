// A sweep's page: every trial's validation loss by step on one chart (from the JSON the server
// puts in the polled section), redrawn in place after each htmx swap. Chart.js is vendored.
(function () {
  function curves() {
    const node = document.getElementById("sweep-curves");
    return node ? JSON.parse(node.textContent) : null;
  }

  function datasets(data) {
    const count = Math.max(data.trials.length, 1);
    return data.trials.map(function (trial, i) {
      const best = trial.number === data.best;
      const colour = "hsl(" + Math.round((360 * i) / count) + ", 65%, 45%)";
      return {
        label: trial.label + (trial.state === "pruned" ? " (pruned)" : "") + (best ? " ★" : ""),
        data: trial.points, borderColor: colour, backgroundColor: colour,
        borderWidth: best ? 4 : 1.5, borderDash: trial.state === "pruned" ? [6, 4] : [],
        pointRadius: 3,
      };
    });
  }

  function draw() {
    const canvas = document.getElementById("sweep-chart");
    const data = curves();
    if (typeof Chart === "undefined" || !canvas || !data) return;
    const chart = Chart.getChart(canvas);
    if (chart) {
      chart.data.datasets = datasets(data);
      chart.update("none");
      return;
    }
    new Chart(canvas, {
      type: "line",
      data: { datasets: datasets(data) },
      options: {
        animation: false, responsive: true, maintainAspectRatio: false, parsing: false,
        scales: { x: { type: "linear", title: { display: true, text: "step" } },
                  y: { title: { display: true, text: "validation loss" } } },
        plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
      },
    });
  }
  document.addEventListener("DOMContentLoaded", draw);
  document.addEventListener("htmx:afterSettle", draw);
})();
