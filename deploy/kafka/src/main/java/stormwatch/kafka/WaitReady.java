package stormwatch.kafka;

import java.util.Collection;
import java.util.Properties;
import java.util.concurrent.TimeUnit;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.DescribeClusterResult;
import org.apache.kafka.common.Node;

/**
 * Waits until a Kafka broker really serves metadata: describeCluster returns at least one
 * (unfenced) broker and listTopics succeeds. One JVM for the whole wait, so polling is cheap.
 *
 * Usage: WaitReady BOOTSTRAP TIMEOUT_SECONDS
 * Exit 0 when ready (prints "ready cluster=<id> nodes=<n>"), 1 on timeout, 2 on bad usage.
 */
public final class WaitReady {
    public static void main(String[] args) throws Exception {
        if (args.length != 2) {
            System.err.println("usage: WaitReady BOOTSTRAP TIMEOUT_SECONDS");
            System.exit(2);
        }
        String bootstrap = args[0];
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[1]));

        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(AdminClientConfig.CLIENT_ID_CONFIG, "stormwatch-kafka-waitready");
        p.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "2000");
        p.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "3000");
        p.put(AdminClientConfig.RECONNECT_BACKOFF_MS_CONFIG, "100");
        p.put(AdminClientConfig.RECONNECT_BACKOFF_MAX_MS_CONFIG, "500");
        p.put(AdminClientConfig.RETRY_BACKOFF_MS_CONFIG, "100");

        String last = "no attempt";
        try (Admin admin = Admin.create(p)) {
            while (System.nanoTime() < deadline) {
                try {
                    DescribeClusterResult dc = admin.describeCluster();
                    Collection<Node> nodes = dc.nodes().get(3, TimeUnit.SECONDS);
                    String clusterId = dc.clusterId().get(3, TimeUnit.SECONDS);
                    admin.listTopics().names().get(3, TimeUnit.SECONDS);
                    if (!nodes.isEmpty()) {
                        System.out.println("ready cluster=" + clusterId + " nodes=" + nodes.size());
                        return;
                    }
                    last = "no brokers registered yet";
                } catch (Exception e) {
                    Throwable c = e.getCause() != null ? e.getCause() : e;
                    last = c.getClass().getSimpleName() + ": " + c.getMessage();
                }
                Thread.sleep(200);
            }
        }
        System.err.println("broker at " + bootstrap + " not ready: " + last);
        System.exit(1);
    }
}
