// Enqueues imageq jobs by task name, as any backend with a Celery client would.
// Usage: node enqueue.js BROKER_URL QUEUE TASK_NAME JOB_DOCUMENT_JSON
const celery = require("celery-node");

async function main() {
  const [brokerUrl, queue, taskName, documentJson] = process.argv.slice(2);
  const document = JSON.parse(documentJson);
  const client = celery.createClient(brokerUrl, brokerUrl, queue);
  client.conf.TASK_PROTOCOL = 2;
  client.sendTask(taskName, [document], {}, document.id);
  // sendTask publishes once the broker is ready; wait for it before closing.
  await client.isReady();
  await new Promise((resolve) => setTimeout(resolve, 200));
  await client.disconnect();
  console.log(document.id);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
