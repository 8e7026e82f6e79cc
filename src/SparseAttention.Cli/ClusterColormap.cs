using ScottPlot;

namespace SparseAttention.Cli;

/// <summary>Maps heatmap values to colours: 0 → black (static pattern), c + 1 → the colour of cluster c.</summary>
internal sealed class ClusterColormap(int clusters) : IColormap
{
    public string Name => "clusters";

    public Color GetColor(double normalizedIntensity)
    {
        int index = (int)Math.Round(normalizedIntensity * clusters);      // the heatmap's range is [0, clusters]
        return index <= 0 ? Colors.Black : PlotStyle.Cluster(index - 1);
    }
}
