"""librdkafka's in-process mock cluster, served to other processes: prints its bootstrap address,
then keeps it up until killed. It long-polls like Apache Kafka (an empty fetch waits
fetch.wait.max.ms), so an idle consumer against it costs what it would against a real cluster.
The topics named on the command line are created (a metadata request creates them in the mock)."""
import sys
import time

from confluent_kafka import Producer

client = Producer({"bootstrap.servers": "unused:1", "test.mock.num.brokers": 1, "log_level": 3})
metadata = client.list_topics(timeout=10)
broker = metadata.brokers[min(metadata.brokers)]
for topic in sys.argv[1:]:
    client.list_topics(topic, timeout=10)
print(f"{broker.host}:{broker.port}", flush=True)
while True:
    time.sleep(3600)
